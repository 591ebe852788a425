"""The Lua scripts, shipped as package data and read with importlib.resources."""
