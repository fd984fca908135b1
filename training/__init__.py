"""autoopt.training"""
