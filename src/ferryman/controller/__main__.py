from ferryman.controller.main import main

main()
