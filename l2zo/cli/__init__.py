"""The ``l2zo`` command line."""
