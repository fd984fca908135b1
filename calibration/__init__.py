"""autoopt.calibration"""
