"""Cross-cutting basics every layer may use: settings, file safety, the Avro codec of the project's records."""
