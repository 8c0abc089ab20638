from webui.app import main

main()
