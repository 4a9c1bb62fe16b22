from edge_quq.cli import main

main()
