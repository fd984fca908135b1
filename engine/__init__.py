"""autoopt.engine"""
