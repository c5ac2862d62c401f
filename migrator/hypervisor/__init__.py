"""migrator.hypervisor"""
