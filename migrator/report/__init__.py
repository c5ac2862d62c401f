"""migrator.report"""
