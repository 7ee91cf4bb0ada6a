"""Layer 5: the LightningModule, the NPFT callbacks and the run plumbing around them (Lightning lives here)."""
