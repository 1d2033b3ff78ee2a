module kube-fim.io/e2e/node/pause

go 1.24.0
