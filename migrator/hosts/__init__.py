"""migrator.hosts"""
