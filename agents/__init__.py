"""autoopt.agents"""
