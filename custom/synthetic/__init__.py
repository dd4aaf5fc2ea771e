"""Synthetic data sets in the published layouts (ACDC, Learn2Reg AbdomenCTCT and ThoraxCBCT) with exact motion."""
