"""The preprocess step: discover inputs, index tars, decode/embed/write stages on Ray Data, the ledger and
the manifest."""
