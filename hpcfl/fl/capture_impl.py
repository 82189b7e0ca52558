"""Built-in captures (imported by :func:`hpcfl.fl.capture.captures`)."""
