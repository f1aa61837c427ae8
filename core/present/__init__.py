"""Floor 5: what people see: charts, where the journey stands, the management report."""
