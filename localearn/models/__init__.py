"""Backbones that ship with localearn (registered through the ``localearn.models`` group)."""
