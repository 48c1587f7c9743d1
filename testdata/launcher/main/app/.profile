export APP_PROFILE="from .profile"
PROFILE_ORDER="$PROFILE_ORDER,app"
