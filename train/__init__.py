"""mscn.train"""
