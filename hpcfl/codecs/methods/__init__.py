"""The five published methods, one module each, built from the library's stages and state model.

Each module registers its codecs (and recipes) when imported by :mod:`hpcfl.codecs.catalog`.
"""
