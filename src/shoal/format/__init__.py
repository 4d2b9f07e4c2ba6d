"""Pure format code: canonical encoding, the index model, Merkle digests, packing rules. No I/O."""
