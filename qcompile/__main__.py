from qcompile.cli import console

console()
