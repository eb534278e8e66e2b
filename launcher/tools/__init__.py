"""The `launcher` command and its tools: plots, sweep summaries, checkpoint conversion and inspection. Training never
imports anything from here."""
