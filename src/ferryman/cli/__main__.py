from ferryman.cli.main import main

main()
