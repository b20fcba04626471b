"""The SpUNet as tables: a spconv-free inference engine built from a state_dict (see `unet`)."""
