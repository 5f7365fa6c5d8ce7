"""mscn.cuda_kernels"""
