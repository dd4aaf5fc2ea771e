"""Tasks and pairing rules of the SegReg MONAI Label app."""
