"""SegReg shared components, referenced from bundle configs as ``custom.<module>.<Name>``."""

__version__ = "0.1.0"
