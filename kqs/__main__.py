from kqs.cli import main

main()
