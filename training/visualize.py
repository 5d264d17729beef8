"""Moved to :mod:`loftup.pictures` (their one home); this name stays so code written against it
keeps working."""

from loftup.pictures import overlay_masks, palette, pca_rgb, save_panels

__all__ = ["pca_rgb", "save_panels", "overlay_masks", "palette"]
