from vitca_cli.cli import main

main()
