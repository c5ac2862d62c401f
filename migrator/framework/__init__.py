"""migrator.framework"""
