"""migrator.migration"""
