"""What every layer shares and none owns: the configuration error type and atomic file writes.
Imports nothing from the project, so model/, kernels/, engine/ and loop/ can all depend on it."""
