"""``lpmosd image build``: the installer environment and the OS images, from Debian packages.

Both are built with ``mmdebstrap`` from the configured mirror (default: the first Debian
mirror apt uses on this machine) and written with ``.sha256`` files beside them, in the
layout the regional serves at ``/boot/files/`` (``installer/vmlinuz``, ``installer/initrd``,
``images/debian-12.tar.zst``).
"""
