"""Small apps that ship with dtfx, to read and to run (``dtfx run dtfx.examples.hello_cities``)."""
