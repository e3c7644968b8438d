"""Torch-free runtime shared by the offline builder and the online service.

Nothing heavy is imported here; import the submodules you need.
"""
