"""The MLflow model registry: the lock, the transaction, register, promote, resolve and the pyfunc wrapper."""
