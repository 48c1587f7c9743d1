export PROFILE_ORDER="a"
