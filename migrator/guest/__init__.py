"""migrator.guest"""
