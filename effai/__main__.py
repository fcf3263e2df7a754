from effai.cli import main

main()
