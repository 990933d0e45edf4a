from ferryman.agent.main import main

main()
