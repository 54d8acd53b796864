"""What brings data in: order intake, reference data (publish and consume), ARCOS replay."""
