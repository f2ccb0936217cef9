"""Results database (SQLModel): tables, engine, ingest from run directories."""
