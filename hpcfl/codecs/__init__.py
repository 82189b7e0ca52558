"""The codec library: registry, stages, pipeline, explicit state and wire format.

Nothing in this package imports MPI. ``get_codec(config)`` builds any codec;
:class:`~hpcfl.codecs.update.UpdateCodec` turns a whole model update into one
wire message and back.
"""

from hpcfl.codecs.base import Codec, Ctx, Encoded
from hpcfl.codecs.registry import codec_classes, expand, get_codec, recipes, register_codec, register_recipe
from hpcfl.codecs.state import CodecState
from hpcfl.codecs.update import UpdateCodec

__all__ = ["Codec", "Ctx", "Encoded", "CodecState", "UpdateCodec", "get_codec", "expand", "register_codec",
           "register_recipe", "codec_classes", "recipes"]
