"""Dataset readers: folders and JSON files as published -> pair records for MONAI dictionary transforms."""
