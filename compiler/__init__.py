"""nibble's compiler: the int4 pass, the build, the artifact and its runtime.

Importing this package is cheap; heavy modules (TVM's compiler, the frontends) load on first use so
that `compiler.runtime` works with TVM's runtime alone.
"""
