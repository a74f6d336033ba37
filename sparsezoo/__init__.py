"""sparsezoo"""
