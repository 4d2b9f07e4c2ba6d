"""The convert tests use the shared fixtures of tests/conftest.py (``store``, ``cache_dir``,
``debian_rootfs``, ``generated_image``); their own helpers live in ``convtools.py`` and the umoci image
fixtures in ``test_umoci.py``."""
