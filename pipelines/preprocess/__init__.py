"""The preprocess step: discover inputs, index tars, decode/embed stages on Ray Data, the ledger and the manifest."""
