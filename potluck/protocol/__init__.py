"""What crosses the wire: keys, configs, signed messages and codecs. Imports nothing else of potluck."""
