"""Byte formats shared by host and board: quant types, their kernels, and (later) the stream schema."""
