"""The meshserve command line: run the local mesh, build models, generate stubs."""
